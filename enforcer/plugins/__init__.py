"""Application filters that come with pinhole, written against enforcer.filters alone."""
