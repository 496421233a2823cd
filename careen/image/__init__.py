"""Probing images: formats, partitions, LVM, filesystems, the OS inside."""
