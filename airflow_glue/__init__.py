"""What ties the pipeline to Airflow: connections and variables (`config`), the Video tags pages
(`ui`), the deadline alerts (`alerts`) and the local Airflow the demo starts (`local_airflow`). Unlike
`tasks/`, everything here imports Airflow."""
