"""Testing support for ophav and its plugins: contract checks (:mod:`.contracts`), synthetic data
(:mod:`.synthetic`) and tiny fake components (:mod:`.fakes`). The pytest plugin (:mod:`.pytest_plugin`) is
registered automatically when ophav is installed and provides the ``ophav_context`` fixture."""
