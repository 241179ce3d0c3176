"""The work each DAG task does, callable without Airflow, and the `vtag` command line."""
