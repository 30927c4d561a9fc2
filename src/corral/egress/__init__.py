"""The egress process: the transparent proxy and the resolver every sandbox's traffic goes through."""
