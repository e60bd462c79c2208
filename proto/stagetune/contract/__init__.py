"""The contract between the service and its clients: typed errors (`errors`), the typed
client (`client`), the study spec (`spec`, a package: model, strict YAML reader, parsing,
the typed runner section, validation, wire conversion), each stage's training settings
(`training`), the stage registry (`stages`), the names of the wire enums' values
(`names`), log redaction (`redact`), data-file checks run where the file lives
(`datafiles`) and the packaged configs (`packaged`).

It imports only the generated wire stubs (`stagetune.v1`) and `stagetune.objectives`."""
