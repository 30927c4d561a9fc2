"""How a sandbox runs: OCI spec and runtime argv (pure), the runtime driver, images, rootfs, cgroups, CRIU."""
