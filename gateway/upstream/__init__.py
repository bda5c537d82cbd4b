"""Upstream HTTP clients behind one small interface (`base.UpstreamClient`)."""
