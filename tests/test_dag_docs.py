"""Every DAG and task documents itself where the Airflow UI shows it (doc_md, from the docstrings)."""

import pytest

pytestmark = pytest.mark.airflow

DAG_IDS = {"yt8m_ingest", "yt8m_train", "yt8m_nightly_inference"}


def test_every_dag_and_task_has_doc_md(dagbag):
    assert set(dagbag.dag_ids) == DAG_IDS
    for dag_id in sorted(DAG_IDS):
        dag = dagbag.get_dag(dag_id)
        assert dag.doc_md and len(dag.doc_md) > 500, dag_id
        for section in ("**When**", "**Params**", "**Reads**", "**Writes**"):
            assert section in dag.doc_md, (dag_id, section)
        undocumented = [name for name in dag.params if f"`{name}`" not in dag.doc_md]
        assert not undocumented, (dag_id, undocumented)
        for task in dag.tasks:
            assert task.doc_md and task.doc_md.strip(), f"{dag_id}.{task.task_id} has no docstring"


def test_the_docs_survive_serialization(dagbag):
    """The UI shows the DAG as the DAG processor serialized it: mapped tasks' docs included."""
    from airflow.serialization.serialized_objects import DagSerialization

    for dag_id in sorted(DAG_IDS):
        dag = dagbag.get_dag(dag_id)
        serialized = DagSerialization.from_dict(DagSerialization.to_dict(dag))
        assert serialized.doc_md == dag.doc_md, dag_id
        assert {t.task_id: t.doc_md for t in serialized.tasks} == {t.task_id: t.doc_md for t in dag.tasks}, dag_id
