"""A volume's mount path is checked when the manifest is read (issue 24, item 6): ``data:/`` used to pass
``validate`` and ``POST /apps`` and fail at run time with the engine's ``invalid mount config``.

The rule (``manifests.mount_target_problem``): absolute; normalised; not ``/``; not ``/proc``, ``/sys``,
``/dev`` or under them; not exactly ``/etc``, ``/bin``, ``/sbin``, ``/usr``, ``/lib``, ``/lib32``,
``/lib64``, ``/libx32``; each path once per service. A refusal is ``FILE:LINE: invalid_mount:
volumes[I]: 'PATH': why``. The API's refusal (400 with the body's lines, from a real daemon) is in
``tests/reliability/test_api_bodies.py``."""

from __future__ import annotations

import pytest

from cynchrod.desired import manifests


def errors(volumes: str, *, services: bool = False) -> list[str]:
    text = (f"name: web\nservices:\n  db:\n    image: i\n    volumes: {volumes}\n" if services
            else f"name: web\nimage: i\nvolumes: {volumes}\n")
    return [str(e) for e in manifests.parse("apps/x.yaml", text.encode()).errors]


@pytest.mark.parametrize(("target", "why"), [
    ("relative/x", "a mount path must be absolute (start with /)"),
    ("/data/", "a mount path must be normalised (no '.', '..', '//' or trailing '/'): write '/data'"),
    ("/data/./x", "a mount path must be normalised (no '.', '..', '//' or trailing '/'): write '/data/x'"),
    ("/data/../etc", "a mount path must be normalised (no '.', '..', '//' or trailing '/'): write '/etc'"),
    ("//data", "a mount path must be normalised (no '.', '..', '//' or trailing '/'): write '/data'"),
    ("/data//x", "a mount path must be normalised (no '.', '..', '//' or trailing '/'): write '/data/x'"),
    ("/", "a volume cannot be mounted over the container's whole filesystem"),
    ("/proc", "/proc, /sys and /dev (and what is under them) belong to the kernel's filesystems"),
    ("/proc/x", "/proc, /sys and /dev (and what is under them) belong to the kernel's filesystems"),
    ("/sys", "/proc, /sys and /dev (and what is under them) belong to the kernel's filesystems"),
    ("/sys/fs/x", "/proc, /sys and /dev (and what is under them) belong to the kernel's filesystems"),
    ("/dev", "/proc, /sys and /dev (and what is under them) belong to the kernel's filesystems"),
    ("/dev/shm", "/proc, /sys and /dev (and what is under them) belong to the kernel's filesystems"),
    *[(d, "a volume over a system directory would hide the image's own files (mount a folder below it)")
      for d in ("/etc", "/bin", "/sbin", "/usr", "/lib", "/lib64", "/lib32", "/libx32")],
])
def test_a_refused_mount_path_names_file_line_code_and_why(target: str, why: str) -> None:
    assert errors(f"['data:{target}']") == [f"apps/x.yaml:3: invalid_mount: volumes[0]: {target!r}: {why}"]
    assert errors(f"['data:{target}:ro']") == [f"apps/x.yaml:3: invalid_mount: volumes[0]: {target!r}: {why}"]
    assert errors(f"[data:/ok, 'data2:{target}']", services=True) == [
        f"apps/x.yaml:5: invalid_mount: services.db.volumes[1]: {target!r}: {why}"]


def test_a_mount_path_given_twice_is_refused() -> None:
    assert errors("[a:/data, b:/srv, c:/data]") == [
        "apps/x.yaml:3: invalid_mount: volumes[2]: '/data' is already the mount path of volumes[0]"]


@pytest.mark.parametrize("target", [
    "/data", "/var/lib/db", "/etc/nginx/conf.d", "/usr/share/nginx/html", "/usr/local/data", "/lib/x",
    "/library", "/etcetera", "/devices", "/procs", "/system", "/home/app/.cache", "/srv/a.b-c_d", "/run/x"])
def test_allowed_mount_paths(target: str) -> None:
    assert errors(f"['data:{target}']") == []


def test_each_line_of_a_list_is_named() -> None:
    text = "name: web\nimage: i\nvolumes:\n  - data:/ok\n  - data2:/\n  - data3:/etc\n"
    assert [str(e) for e in manifests.parse("apps/x.yaml", text.encode()).errors] == [
        "apps/x.yaml:5: invalid_mount: volumes[1]: '/': a volume cannot be mounted over the container's "
        "whole filesystem",
        "apps/x.yaml:6: invalid_mount: volumes[2]: '/etc': a volume over a system directory would hide the "
        "image's own files (mount a folder below it)"]
