"""The tools that run oncelery for you: the bench, chaos, the demo, and the process harness they
share."""
