//! QEMU as a backend: command line from a config, QMP client, accelerator detection, process supervision
