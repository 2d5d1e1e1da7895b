"""ophav plugin: meshwarp, the image2video that warps the portrait with its tracked face mesh.

It works with any tracker whose tracking's topology names the groups of :data:`ophav_meshwarp.topology.GROUPS`
and carries a mirror map; the tracker and segmenter are the run's own (``draws_on``)."""
