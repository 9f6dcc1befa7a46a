"""Support code shared by the tests (``tests/``) and the benchmarks (``benchmarks/``).

Neither the product (``models``, ``service``, ``training``, ``branchy_client``) nor the
installed wheel contains it; the benchmarks import it instead of ``tests/``, which they
never import (``tests/test_layout.py`` checks both by AST).

* :mod:`testsupport.server`: the one launcher of real server processes;
* :mod:`testsupport.hooked_server`: ``python -m service`` with a fault-injection seam;
* :mod:`testsupport.checkpoints`: the one checkpoint factory (fresh, seeded networks);
* :mod:`testsupport.multipart`: the one ``multipart/form-data`` encoder;
* :mod:`testsupport.badimages`: every bad-input case, generated as bytes;
* :mod:`testsupport.reliability`: offline answer key, metrics parsing, the error shape,
  schemathesis fuzzing;
* :mod:`testsupport.deploy`: parsers of the deployment files (Dockerfile, compose,
  Kubernetes manifests, Prometheus rules) that ``tests/deploy`` checks.
"""
