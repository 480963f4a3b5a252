/*-------------------------------------------------------------------------
 *
 * support.c
 *	  Planner support for the row-level helpers: what makes a policy that
 *	  calls apikey.current_owner() cost what a literal costs.
 *
 *-------------------------------------------------------------------------
 */
#include "postgres.h"

#include "catalog/pg_type.h"
#include "nodes/makefuncs.h"
#include "nodes/nodeFuncs.h"
#include "nodes/parsenodes.h"
#include "nodes/pathnodes.h"
#include "nodes/supportnodes.h"
#include "parser/parse_func.h"
#include "utils/lsyscache.h"

#include "apikey.h"

/*
 * Planner support for the row-level helpers (current_key_id, current_owner,
 * has_scope with a constant or parameter argument).
 *
 * Written plainly in a policy, USING (tenant = apikey.current_owner()), a
 * STABLE function is called once per row.  Its value cannot change during
 * the statement, so we rewrite the call into an uncorrelated scalar
 * sub-select of its twin without support, (SELECT apikey._current_owner()),
 * which the planner turns into an init plan: evaluated once per execution,
 * at run time (never folded into a cached plan), and handed to parallel
 * workers as a parameter.  A policy then costs what the same query with
 * the owner written as a literal costs.
 *
 * The rewrite happens only where the planner will turn the sub-select into
 * an init plan: during its expression preprocessing, when it passes us its
 * PlannerInfo.  Elsewhere (root == NULL: defaults, constraints, index
 * expressions) the call is left alone.  So is a statement that reads no
 * table (SELECT apikey.current_owner()): it evaluates the call once anyway,
 * and PL/pgSQL runs such statements as "simple expressions" on the
 * assumption that their plans have no init plans.
 */
Node *
apikey_support_simplify(SupportRequestSimplify *req)
{
	FuncExpr   *call = req->fcall;
	PlannerInfo *root = req->root;
	ListCell   *lc;
	char	   *name;
	Oid			inner;
	Oid			argtypes[FUNC_MAX_ARGS];
	int			nargs = 0;
	FuncExpr   *inner_call;
	Query	   *query;
	SubLink    *sublink;

	if (root == NULL || root->parse == NULL || root->parse->commandType == CMD_UTILITY)
		return NULL;

	/* a statement without FROM has only the planner's placeholder RTE_RESULT */
	foreach(lc, root->parse->rtable)
	{
		if (lfirst_node(RangeTblEntry, lc)->rtekind != RTE_RESULT)
			break;
	}
	if (lc == NULL)
		return NULL;

	/* only row-invariant arguments: constants and query parameters */
	foreach(lc, call->args)
	{
		Node	   *arg = lfirst(lc);

		if (!IsA(arg, Const) &&
			!(IsA(arg, Param) && ((Param *) arg)->paramkind == PARAM_EXTERN))
			return NULL;
		argtypes[nargs++] = exprType(arg);
	}

	/* the twin: same schema, same arguments, name prefixed with "_" */
	name = get_func_name(call->funcid);
	if (name == NULL)
		return NULL;
	inner = LookupFuncName(list_make2(makeString(get_namespace_name(get_func_namespace(call->funcid))),
									  makeString(psprintf("_%s", name))),
						   nargs, argtypes, true);
	if (!OidIsValid(inner))
		return NULL;

	inner_call = copyObject(call);
	inner_call->funcid = inner;

	query = makeNode(Query);
	query->commandType = CMD_SELECT;
	query->querySource = QSRC_ORIGINAL;
	query->canSetTag = true;
	query->jointree = makeFromExpr(NIL, NULL);
	query->targetList = list_make1(makeTargetEntry((Expr *) inner_call, 1,
												   pstrdup(name), false));

	sublink = makeNode(SubLink);
	sublink->subLinkType = EXPR_SUBLINK;
	sublink->subLinkId = 0;
	sublink->testexpr = NULL;
	sublink->operName = NIL;
	sublink->subselect = (Node *) query;
	sublink->location = call->location;

	/* tell the planner there is now a sub-select to turn into a plan */
	root->parse->hasSubLinks = true;
	return (Node *) sublink;
}
