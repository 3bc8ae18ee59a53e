"""llmsup: a supervisor for vLLM and Ollama inference servers."""

__version__ = "0.1.0"
