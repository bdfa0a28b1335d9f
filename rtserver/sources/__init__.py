"""Change feeds: each source reads one kind of feed and hands normalized events to the bus."""
