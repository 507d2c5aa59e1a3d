"""Retrieval quality on the user's own data: ``m3 eval`` (extra ``m3-runtime[eval]``).

``data`` reads a BEIR-layout set, ``retrieval`` ranks it exactly per mode, ``metrics``
scores the rankings with pytrec_eval and compares variants with SciPy, ``run`` drives a
package's variants, ``tune`` searches the hybrid weights, ``report`` prints and plots.
"""
