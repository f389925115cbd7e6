"""Worker service: an OpenAI-compatible model server with admission control and heartbeats."""
