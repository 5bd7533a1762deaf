"""KubeCASH: userspace accelerator virtualization runtime."""
