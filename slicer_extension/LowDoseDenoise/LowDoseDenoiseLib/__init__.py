"""Code of the LowDoseDenoise module that needs no Slicer: standard library only, tested in plain Python.

``client``: the HTTP client of the lowdose server. ``jobs``: a request in a background thread, polled by the
GUI. ``settings``: what the module remembers (servers, permission, tokens, choices, time limits). ``dose``:
the dose as the user gives it. ``strength``: the denoising strength (low, medium, high or a fraction).
``steps``: a diffusion model's sampling steps. ``ensemble``: the self-ensemble (each slice denoised flipped and
turned too, the answers averaged: 1, 2, 4 or 8). ``results``: the fidelity table and the record kept on denoised
volumes. ``messages``: every text the module shows the user.
"""
