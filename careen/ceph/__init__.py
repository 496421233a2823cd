"""Ceph RBD: Glance images stored in a Ceph pool, read and published inside the cluster."""
