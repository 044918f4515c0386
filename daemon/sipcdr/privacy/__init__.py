"""Retention, legal holds, data-subject rights and the audit log.

Pure planning (`plan`, `pseudonym`, `settings`) is kept apart from the
modules that talk to PostgreSQL or the file system (`retention`, `holds`, `subjects`,
`audit`, `files`); `commands` registers the `sipcdr retention|hold|subject|audit`
subcommands and `task` runs retention inside the daemon. Which fields hold personal
data is `sipcdr.model`'s catalogue (`PERSONAL_FIELDS`, `PERSONAL_COLUMNS`).
"""
