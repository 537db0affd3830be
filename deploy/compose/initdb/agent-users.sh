# Sourced (not executed: keep it non-executable) by the mariadb image when it creates the
# database of an agent's region: the agent's users with the README's grants and nothing more
# (the agent refuses to start when its user holds more), passwords from the compose secrets.
docker_process_sql --database=mysql <<SQL
CREATE USER 'twopc_agent'@'%' IDENTIFIED BY '$(cat /run/secrets/agent_mysql_password)';
GRANT SELECT, INSERT, UPDATE, DELETE ON shop.* TO 'twopc_agent'@'%';
GRANT CREATE ON shop.twopc_branch_marker TO 'twopc_agent'@'%';
CREATE USER 'twopc_lockwait'@'%' IDENTIFIED BY '$(cat /run/secrets/lock_waits_password)';
GRANT PROCESS ON *.* TO 'twopc_lockwait'@'%';
SQL
