"""Tools for trying, breaking and measuring twopc on one machine: the local playground and the
demo, the fault harness (``twopc chaos``) and the benchmarks. They drive the real daemons, so
they need the daemons' extras (``pip install 'twopc[chaos]'`` or ``'twopc[bench]'``)."""
