"""The configs that ship with stagetune: example study configs, DeepSpeed JSONs and the
warm-start defaults. Data only; read them through `stagetune.contract.packaged`."""
