"""Glance as a source and a destination of refits.

`cloud` connects through openstacksdk the way the `openstack` client does; `source`
finds a Glance image, checks it can be refitted and streams its data to a local work
file; `metadata` decides, field by field, what the new image inherits; `publish`
creates, uploads, verifies and finally retires; `command` is the glue the CLI calls.
Images are read and written as the API shows them (every property at the top level),
through the raw HTTP adapter, because openstacksdk's `Image` resource drops fields it
does not know.
"""
