"""The node: how sandboxes run on this host (images, disks, the OCI runtime, cgroups) and what runs now."""
