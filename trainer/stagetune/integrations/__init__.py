"""stagetune for the training libraries teams already use: ``transformers`` (and every TRL
trainer, which is one) through ``stagetune.integrations.transformers.StagetuneCallback``."""
