"""Retention, legal holds, data-subject rights and the audit log.

Pure planning (`plan`, `catalogue`, `pseudonym`, `settings`) is kept apart from the
modules that talk to PostgreSQL or the file system (`retention`, `holds`, `subjects`,
`audit`, `files`); `commands` registers the `sipcdr retention|hold|subject|audit`
subcommands and `task` runs retention inside the daemon.
"""
