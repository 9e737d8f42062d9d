"""The OpenAI Batch API: uploaded files, batches over them, and the runner that sends their lines through the
gateway, resumable after a crash without losing or repeating a line."""
