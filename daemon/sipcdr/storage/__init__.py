"""PostgreSQL storage: schema migrations (`migrations`), daily partitions
(`partitions`) and the private server behind `dsn = "embedded"` (`embedded`).

The PostgreSQL sink (`sinks.postgres`) and `sipcdr db migrate` are their users.
"""
