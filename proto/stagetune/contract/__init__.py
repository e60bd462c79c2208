"""The contract between the service and its clients: typed errors (`errors`), the typed
client (`client`), the study spec (`spec`), the stage catalog (`stages`), log redaction
(`redact`), local data-file checks (`datafiles`) and the packaged configs (`packaged`).

It imports only the generated wire stubs (`stagetune.v1`) and `stagetune.objectives`."""
