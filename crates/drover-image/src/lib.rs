//! Builds the default guest image (Debian kernel as ELF vmlinux, busybox initramfs, virtio modules, drover-agent)
