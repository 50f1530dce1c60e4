"""Engine folders (engines/<name>/): a manifest plus the files a backend needs."""
