"""The model zoo by name (``zoo``) and the character-level GPT (``char_gpt``)."""
