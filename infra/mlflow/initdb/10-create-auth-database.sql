-- Run once by the postgres image when its data volume is empty (files in
-- /docker-entrypoint-initdb.d). POSTGRES_DB already created the run store "mlflow";
-- the basic-auth user store gets a database of its own, owned by the same role.
CREATE DATABASE mlflow_auth OWNER mlflow;
