"""Where the time went: the in-process sampler of slow requests, and py-spy from outside."""
