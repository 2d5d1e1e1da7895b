"""Running the method: the resumable scheduler of one run (portrait -> coarse video -> tracking -> masks -> fit ->
restore rounds), the render requests it and ``ophav render`` build (:mod:`.animate`) and the run's report."""
