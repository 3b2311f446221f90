"""Developer tooling: the `aiq` command, `aiq dev`, embedded servers, the LLM simulator, process launching.

Nothing in api/, worker/ or shared/ imports this package; it imports the domain only where it must.
"""
