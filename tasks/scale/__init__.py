"""Scale-out on Ray (the optional ``ray`` extra): the one module that talks to Ray's runtime
(``ray_runtime``), recipe search on Ray Tune (``tune``) and batch inference on Ray Data (``batch``)."""
