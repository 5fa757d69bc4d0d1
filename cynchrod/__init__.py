"""cynchrod: a GitOps reconciler for plain Docker hosts.

Apps are declared as YAML manifests in a Git repository; the daemon keeps the
containers on this host equal to what the newest good commit declares.
"""

__version__ = "0.1.0"
