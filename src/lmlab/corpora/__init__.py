"""The built-in corpora that may be redistributed, xz-compressed inside the package, so that the
default experiment and `data=names` run on a machine with no network (see README.md here)."""
