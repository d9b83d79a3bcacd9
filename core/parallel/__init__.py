"""The parallel layout and its parts: degrees, process groups, data parallel, partitioning and balance."""
