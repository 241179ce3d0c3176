"""yt8m_train's human gate (no DAG here): an Airflow human-in-the-loop task whose result is a decision."""

from datetime import timedelta

from airflow.providers.standard.operators.hitl import HITLOperator

APPROVE, REJECT = "Approve", "Reject"
DECISIONS = {APPROVE: "approved", REJECT: "rejected"}


class PromotionReview(HITLOperator):
    """Shows its (templated) subject and body, offers Approve and Reject in Airflow's Required actions, and
    waits at most the run's `approval_timeout_hours`. Its result is `{"decision", "by"}`: decision
    `approved`, `rejected` or `timed_out`, so that no answer in time is an outcome to record, not a
    failed task."""

    def __init__(self, **kwargs):
        super().__init__(options=[APPROVE, REJECT], **kwargs)

    def execute(self, context):
        hours = context["params"].get("approval_timeout_hours")
        # response_timeout is not a template field: the run's param is read when the run asks
        self.response_timeout = timedelta(hours=hours) if hours else None
        return super().execute(context)

    def execute_complete(self, context, event):
        if event.get("error_type") == "timeout":
            return {"decision": "timed_out", "by": None}
        answer = super().execute_complete(context, event)
        user = answer["responded_by_user"] or {}
        return {"decision": DECISIONS[answer["chosen_options"][0]], "by": user.get("name") or user.get("id")}
