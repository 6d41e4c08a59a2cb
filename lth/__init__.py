"""lth: the lottery-ticket training stack over sparsekern (`python -m lth.train`)."""
