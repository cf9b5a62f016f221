#!/usr/bin/env python3
# Finds import cycles between pgswitch's top-level modules (src/<module>):
# every `crate::<module>` path outside comments and unit tests is an edge;
# a strongly connected component of more than one module is a cycle.
# Exits non-zero on one. Run by .ci/run; ARCHITECTURE.md's invariant.
import re,os,sys
from collections import defaultdict
root='src'
deps=defaultdict(set)
mods=set()
for dp,dn,fn in os.walk(root):
    for f in fn:
        if not f.endswith('.rs'): continue
        path=os.path.join(dp,f)
        rel=os.path.relpath(path,root)
        top=rel.split('/')[0].replace('.rs','')
        if top in ('main','lib'): continue
        mods.add(top)
        src=open(path).read()
        src=re.sub(r'#\[cfg\(test\)\]\s*mod tests \{.*','',src,flags=re.S)
        src='\n'.join(l for l in src.splitlines() if not l.lstrip().startswith('//'))
        for m in re.findall(r'crate::([a-z_]+)',src):
            if m!=top: deps[top].add(m)
        # use crate::{a, b}
        for grp in re.findall(r'crate::\{([^}]*)\}',src):
            for m in re.findall(r'\b([a-z_]+)\b',grp):
                if m!=top: deps[top].add(m)
deps={k:{d for d in v if d in mods} for k,v in deps.items()}
# tarjan
index={};low={};st=[];on=set();res=[];i=[0]
def sc(v):
    index[v]=low[v]=i[0];i[0]+=1;st.append(v);on.add(v)
    for w in deps.get(v,()):
        if w not in index: sc(w);low[v]=min(low[v],low[w])
        elif w in on: low[v]=min(low[v],index[w])
    if low[v]==index[v]:
        comp=[]
        while True:
            w=st.pop();on.discard(w);comp.append(w)
            if w==v:break
        if len(comp)>1: res.append(comp)
sys.setrecursionlimit(10000)
for v in mods:
    if v not in index: sc(v)
if res:
    print("import cycles between top-level modules:", res)
    for k in sorted(deps): print(" ", k, "->", ", ".join(sorted(deps[k])))
    sys.exit(1)
print("no import cycles between the", len(mods), "top-level modules")
