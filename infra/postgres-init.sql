-- Databases of the two servers (run once by the postgres image on an empty volume).
CREATE DATABASE prefect;
CREATE DATABASE mlflow;
