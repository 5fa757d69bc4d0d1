"""The imperative shell of one reconciler process: passes (``reconciler``), builds, imperative calls as
commits (``control``), the channel between the API workers and the reconciler, metrics, and the
API's view of them all (``front``)."""
