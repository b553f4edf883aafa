CREATE DATABASE mlflow OWNER orchestra;
