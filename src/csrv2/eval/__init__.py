"""Evaluation: metrics, tasks, the MRL baselines, the comparison suite (`csrv2 reproduce`), its report, and MTEB."""
