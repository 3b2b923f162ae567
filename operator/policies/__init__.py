"""The lifecycle policies of a job, one per module, each a pure function of the observation.

=================  ==========================================================================
upstream           the model to work on: a CompressJob waits for the FineTuneJob it compresses
validation         the spec renders; the plan and the validation Job, re-rendered until the start
acceptance         what a job may run and reference: pod templates, images, ServiceAccount, Secret
suspension         spec.suspend and Kueue admission: suspend and resume Jobs, pause the deadline
pruning            kubetune.io/prune: a sweep stops its trial, Failed with reason Pruned
deadline           activeDeadlineSeconds over the time not spent suspended
failure            exit codes and terminations: fail at once, restart the gang, or give up
gang               the training or compression Job of each attempt; success records the artifacts
serving            the serving Deployment and Service of a succeeded job
ttl                ttlSecondsAfterFinished: the workload children go, artifacts and serving stay
=================  ==========================================================================

Each returns a :class:`kubetune.operator.lifecycle.Decision`; :mod:`kubetune.operator.reconcile`
composes them. A policy that time alone can change returns when to look again
(``Decision.recheck_after``) rather than being polled.
"""
