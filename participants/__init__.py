"""The participant agent: owns the XA branches on one MySQL/MariaDB server and answers the
coordinator."""
