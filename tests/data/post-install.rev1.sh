#!/bin/sh
# golden post-install hook: checks nothing, says so
echo post-install ok
