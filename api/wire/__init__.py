"""Wire formats: one Flask blueprint per HTTP interface, each a thin adapter over
`api.generation.GenerationService`. They parse and validate their own request shapes, build a
GenerationRequest, and render replies and errors in their own format."""
